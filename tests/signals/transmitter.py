"""A Shared Signals transmitter for the tests: a real Starlette app (served by uvicorn) with SSF 1.0
configuration metadata, a JWKS, stream management (create, read, status, verify, add and remove
subjects) and an RFC 8936 poll endpoint. It signs real SETs (RFC 8417) with its own EC key and
pushes them (RFC 8935) over HTTP to the endpoint bastion gave it. With ``default_subjects`` "NONE"
(SSF 1.0 §7.1) `deliver` sends an event only about a subject added to the stream (§8.1.3); with
``one_stream`` it allows one stream per receiver and answers a second create 409 (§8.1.1.1).
A stream's configuration is updated by PATCH (§8.1.1.3: the Receiver-Supplied members sent are
replaced, the others kept, a Transmitter-Supplied one sent must match), each request recorded
in ``stream_calls``; `deliver` sends only the event types of the stream's ``events_delivered``
(§8.1.1: those requested that it supports).
`answer_next` makes an endpoint's next answer one of the test's (any status, type and bytes),
and `calls` counts the requests each endpoint was sent. ``moved`` serves the key set (holding
``moved_key`` instead) and the subject endpoints under ``/moved``, the metadata naming them there
and the old places answering 404; ``metadata_down`` answers the metadata 503, and
``metadata_overrides`` sets members of it to other values (another issuer, an insecure URL)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
from joserfc import jws
from joserfc.jwk import ECKey, OctKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests import clients
from tests.oauth.support import ANY_KID, free_socket, serve

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
BEARER = "transmitter-management-credential"


class Transmitter:
    def __init__(self, audience: str) -> None:
        self.url = ""  # set once served
        self.audience = audience
        self.key = ECKey.generate_key("P-256", parameters={"kid": "k1"})
        self.streams: dict[str, dict[str, Any]] = {}
        self.queued: dict[str, str] = {}  # jti -> SET, for poll
        self.acked: list[str] = []
        self.errors: dict[str, dict] = {}
        self.pushed: list[httpx.Response] = []
        self.lock = threading.Lock()
        self.critical_subject_members: list[str] = []  # SSF 1.0 §7.1, when not empty
        self.default_subjects: str | None = None  # SSF 1.0 §7.1: "ALL", "NONE" or unsaid
        self.subject_endpoints = False  # add_subject_endpoint, remove_subject_endpoint
        self.subjects: dict[str, list[dict]] = {}  # stream id -> the subjects added to it
        self.subject_calls: list[tuple[str, dict]] = []  # ("add" | "remove", request body)
        # The status an add or remove answers for a subject (its JSON, sorted keys): 200/204
        # when not named. Only a 2xx changes the stream's subjects.
        self.subject_answers: dict[str, int] = {}
        # A subject whose next add or remove waits here until the test sets it (its JSON, as
        # subject_answers): the request is recorded in subject_calls as it arrives.
        self.subject_holds: dict[str, threading.Event] = {}
        self.one_stream = False  # a second create answers 409 Conflict
        # Endpoint ("metadata", "jwks", "stream", "status", "verify", "poll", "subjects") ->
        # the answers it gives next, in turn, instead of its own: (status, content type, body).
        self.answers: dict[str, list[tuple[int, bytes, bytes]]] = {}
        self.calls: Counter[str] = Counter()  # requests each endpoint was sent
        # The event types it can send (SSF 1.0 §8.1.1 events_supported): every one when None.
        self.events_supported: list[str] | None = None
        # Each POST and PATCH of the configuration endpoint: (method, request body).
        self.stream_calls: list[tuple[str, dict]] = []
        # What a PATCH answers instead of updating the stream (405: not implemented), or
        # "unchanged": 200 with the stream as it was (an update it did not apply).
        self.patch_answer: int | str | None = None
        # Each stream's status (SSF 1.0 §8.1.2.1), read at its status endpoint.
        self.status: dict[str, str] = {}
        # The key set and subject endpoints served under /moved (the old places: 404), the key
        # set there holding moved_key; the metadata answering 503; members of it set otherwise.
        self.moved = False
        self.moved_key = ECKey.generate_key("P-256", parameters={"kid": "k2"})
        self.metadata_down = False
        self.metadata_overrides: dict[str, Any] = {}
        # A list: the verification events asked for are kept here, not sent (a test sends one
        # late, with `queue` or `push`).
        self.verifications_held: list[str] | None = None
        # Called as a stream is created, before the answer goes (a test cuts the database).
        self.on_create: Callable[[], None] | None = None

    # -- signing -----------------------------------------------------------------------------

    def set_token(
        self,
        event_type: str,
        event: dict | None = None,
        sub_id: dict | None = None,
        *,
        header: dict | None = None,
        key=None,
        **claims,
    ) -> str:
        payload = {
            "iss": self.url,
            "aud": self.audience,
            "iat": int(time.time()),
            "jti": uuid.uuid4().hex,
            "events": {event_type: event or {}},
            **({"sub_id": sub_id} if sub_id is not None else {}),
            **claims,
        }
        # A header member given as None is left out (a SET without typ, say).
        protected = {
            name: value
            for name, value in {"alg": "ES256", "typ": "secevent+jwt", "kid": "k1",
                                **(header or {})}.items()
            if value is not None
        }  # fmt: skip
        return jws.serialize_compact(
            protected,
            json.dumps(payload).encode(),
            key or self.key,
            algorithms=[protected["alg"]],
            registry=ANY_KID,
        )

    @staticmethod
    def hs256(token_payload: dict, secret: str = "x" * 32) -> str:
        return jws.serialize_compact(
            {"alg": "HS256", "typ": "secevent+jwt", "kid": "k1"},
            json.dumps(token_payload).encode(),
            OctKey.import_key(secret),
            algorithms=["HS256"],
        )

    # -- delivery ----------------------------------------------------------------------------

    def stream(self, method: str) -> dict:
        found = [s for s in self.streams.values() if s["delivery"]["method"] == method]
        assert found, f"no {method} stream was created"
        return found[-1]

    def push(self, token: str, *, authorization: str | None = None, content_type=None):
        stream = self.stream("urn:ietf:rfc:8935")
        delivery = stream["delivery"]
        response = clients.post(
            delivery["endpoint_url"],
            content=token,
            headers={
                "content-type": content_type or "application/secevent+jwt",
                "authorization": delivery["authorization_header"]
                if authorization is None
                else authorization,
            },
            timeout=20,
        )
        self.pushed.append(response)
        return response

    def deliver(self, event_type: str, event: dict | None, sub_id: dict) -> str | None:
        """Send an event about ``sub_id`` over the newest stream (push, or queued for poll) as a
        transmitter does: with default_subjects "NONE" only when that subject was added to the
        stream (SSF 1.0 §8.1.3.1: simple subjects match when identical). The SET, or None when
        the subject is not on the stream and nothing was sent."""
        stream = list(self.streams.values())[-1]
        if event_type not in stream.get("events_delivered", []):
            return None  # not an event type of the stream (SSF 1.0 §8.1.1 events_delivered)
        if self.default_subjects == "NONE" and sub_id not in self.subjects.get(
            stream["stream_id"], []
        ):
            return None
        token = self.set_token(event_type, event, sub_id)
        if stream["delivery"]["method"] == "urn:ietf:rfc:8936":
            self.queue(token)
        else:
            response = self.push(token)
            assert response.status_code == 202, response.text
        return token

    def delivered(self, requested: list) -> list:
        """SSF 1.0 §8.1.1 events_delivered: the requested event types it supports."""
        supported = self.events_supported
        return [e for e in requested if supported is None or e in supported]

    def hold(self, stream_id: str, delivery: dict, requested: list, **more) -> dict:
        """A stream made before the tests' bastion started (by an earlier version, say)."""
        self.streams[stream_id] = {
            "stream_id": stream_id, "iss": self.url, "aud": self.audience,
            "delivery": delivery, "events_requested": list(requested),
            "events_delivered": self.delivered(requested), **more,
        }  # fmt: skip
        return self.streams[stream_id]

    @staticmethod
    def subject_key(subject: dict) -> str:
        return json.dumps(subject, sort_keys=True)

    def queue(self, token: str) -> str:
        payload = token.split(".")[1]
        import base64

        jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
        with self.lock:
            self.queued[jti] = token
        return jti

    def answer_next(self, endpoint: str, status: int, content_type: bytes, body: bytes) -> None:
        """The next request to ``endpoint`` is answered so, and changes nothing here (its body
        is not read)."""
        with self.lock:
            self.answers.setdefault(endpoint, []).append((status, content_type, body))

    def _counted(self, endpoint: str, handler):
        async def answer(request: Request):
            named = endpoint
            if endpoint == "stream" and request.method == "GET" and not request.query_params:
                # Its list of streams (SSF 1.0 §8.1.1.2) is counted and answered as an endpoint
                # of its own; one stream read by its id is "stream", as its creation is.
                named = "list"
            with self.lock:
                self.calls[named] += 1
                queued = self.answers.get(named)
                given = queued.pop(0) if queued else None
            if given is None:
                return await handler(request)
            status, content_type, body = given
            headers = {"content-type": content_type.decode("latin-1")} if content_type else {}
            return Response(body, status, headers=headers)

        return answer

    # -- the HTTP app --------------------------------------------------------------------------

    def app(self) -> Starlette:
        def authorized(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {BEARER}"

        async def metadata(request: Request):
            if self.metadata_down:
                return JSONResponse({"error": "down"}, 503)
            at = f"{self.url}/moved" if self.moved else self.url
            return JSONResponse(
                {
                    "spec_version": "1_0",
                    "issuer": self.url,
                    "jwks_uri": f"{at}/jwks.json",
                    "delivery_methods_supported": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"],
                    "configuration_endpoint": f"{self.url}/ssf/stream",
                    "status_endpoint": f"{self.url}/ssf/status",
                    "verification_endpoint": f"{self.url}/ssf/verify",
                    **(
                        {"critical_subject_members": self.critical_subject_members}
                        if self.critical_subject_members
                        else {}
                    ),
                    **(
                        {"default_subjects": self.default_subjects} if self.default_subjects else {}
                    ),
                    **(
                        {
                            "add_subject_endpoint": f"{at}/ssf/subjects:add",
                            "remove_subject_endpoint": f"{at}/ssf/subjects:remove",
                        }
                        if self.subject_endpoints
                        else {}
                    ),
                    **self.metadata_overrides,
                }
            )

        def where(handler, moved: bool):
            """``handler`` where it is served now; 404 where it no longer is."""

            async def answer(request: Request):
                if self.moved != moved:
                    return JSONResponse({"error": "not here"}, 404)
                return await handler(request)

            return answer

        async def jwks(request: Request):
            key = self.moved_key if self.moved else self.key
            return JSONResponse({"keys": [key.as_dict(private=False)]})

        async def stream(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            if request.method == "GET":
                if "stream_id" not in request.query_params:
                    # SSF 1.0 §8.1.1.2: without a stream_id, the list of the receiver's streams.
                    return JSONResponse(list(self.streams.values()))
                found = self.streams.get(request.query_params.get("stream_id", ""))
                return JSONResponse(found) if found else JSONResponse({}, 404)
            body = await request.json()
            self.stream_calls.append((request.method, body))
            if request.method == "PATCH":
                return update(body)
            # Checked after the last await: two replicas creating at once get one stream.
            if self.one_stream and self.streams:
                return JSONResponse({"error": "a stream exists for this receiver"}, 409)
            stream_id = uuid.uuid4().hex
            delivery = dict(body["delivery"])
            if delivery["method"] == "urn:ietf:rfc:8936":
                delivery["endpoint_url"] = f"{self.url}/ssf/poll/{stream_id}"
            self.streams[stream_id] = {
                "stream_id": stream_id,
                "iss": self.url,
                "aud": self.audience,
                "delivery": delivery,
                "events_requested": body.get("events_requested", []),
                "events_delivered": self.delivered(body.get("events_requested", [])),
            }
            if self.on_create is not None:
                self.on_create()
            return JSONResponse(self.streams[stream_id], 201)

        def update(body: dict) -> Response:
            """SSF 1.0 §8.1.1.3."""
            if isinstance(self.patch_answer, int):
                return JSONResponse({"error": "not updated"}, self.patch_answer)
            found = self.streams.get(body.get("stream_id"))
            if found is None:
                return JSONResponse({}, 404 if "stream_id" in body else 400)
            for member in ("iss", "aud", "events_supported", "events_delivered"):
                if member in body and body[member] != found.get(member):
                    return JSONResponse({"error": f"{member} does not match"}, 400)
            if self.patch_answer == "unchanged":
                return JSONResponse(found)
            for member in ("events_requested", "delivery", "description"):
                if member in body:
                    found[member] = body[member]
            found["events_delivered"] = self.delivered(found.get("events_requested", []))
            return JSONResponse(found)

        async def status(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            if request.query_params.get("stream_id") not in self.streams:
                return JSONResponse({}, 404)
            stream_id = request.query_params["stream_id"]
            return JSONResponse(
                {"stream_id": stream_id, "status": self.status.get(stream_id, "enabled")}
            )

        async def verify(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            body = await request.json()
            stream = self.streams.get(body.get("stream_id"))
            if stream is None:
                return JSONResponse({"error": "no such stream"}, 404)
            token = self.set_token(
                VERIFICATION,
                {"state": body.get("state")},
                {"format": "opaque", "id": body["stream_id"]},
            )
            if self.verifications_held is not None:
                self.verifications_held.append(token)
            elif stream["delivery"]["method"] == "urn:ietf:rfc:8936":
                self.queue(token)
            else:
                delivery = stream["delivery"]

                def send() -> None:
                    # A receiver that is not there (a test's made-up push_url) misses it, as
                    # a transmitter's receiver would.
                    with contextlib.suppress(httpx.HTTPError):
                        httpx.post(
                            delivery["endpoint_url"],
                            content=token,
                            headers={
                                "content-type": "application/secevent+jwt",
                                "authorization": delivery["authorization_header"],
                            },
                            timeout=20,
                        )

                threading.Thread(target=send, daemon=True).start()
            return Response(status_code=204)

        async def subjects(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            action = request.path_params["action"]
            if action not in ("add", "remove"):
                return JSONResponse({}, 404)
            body = await request.json()
            self.subject_calls.append((action, body))
            added = self.subjects.setdefault(body.get("stream_id"), [])
            if body.get("stream_id") not in self.streams or not isinstance(
                body.get("subject"), dict
            ):
                return JSONResponse({}, 404 if body.get("stream_id") not in self.streams else 400)
            hold = self.subject_holds.pop(self.subject_key(body["subject"]), None)
            if hold is not None:
                await anyio.to_thread.run_sync(hold.wait, 60)
            answer = self.subject_answers.get(self.subject_key(body["subject"]))
            if answer is not None and not 200 <= answer < 300:
                return JSONResponse({"error": "refused"}, answer)
            if action == "add":
                if body["subject"] not in added:
                    added.append(body["subject"])
                return Response(status_code=answer or 200)
            if body["subject"] in added:
                added.remove(body["subject"])
            return Response(status_code=answer or 204)

        async def poll(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            body = await request.json()
            with self.lock:
                for jti in body.get("ack", []):
                    self.acked.append(jti)
                    self.queued.pop(jti, None)
                for jti, err in body.get("setErrs", {}).items():
                    self.errors[jti] = err
                    self.queued.pop(jti, None)
                most = int(body.get("maxEvents", 100))
                sets = dict(list(self.queued.items())[:most])
                more = len(self.queued) > most
            return JSONResponse({"sets": sets, "moreAvailable": more})

        return Starlette(
            routes=[
                Route("/.well-known/ssf-configuration", self._counted("metadata", metadata)),
                Route("/jwks.json", self._counted("jwks", where(jwks, False))),
                Route("/moved/jwks.json", self._counted("moved jwks", where(jwks, True))),
                Route(
                    "/ssf/stream", self._counted("stream", stream), methods=["GET", "POST", "PATCH"]
                ),
                Route("/ssf/status", self._counted("status", status)),
                Route("/ssf/verify", self._counted("verify", verify), methods=["POST"]),
                Route("/ssf/poll/{stream_id}", self._counted("poll", poll), methods=["POST"]),
                Route(
                    "/ssf/subjects:{action:str}",
                    self._counted("subjects", where(subjects, False)),
                    methods=["POST"],
                ),
                Route(
                    "/moved/ssf/subjects:{action:str}",
                    self._counted("moved subjects", where(subjects, True)),
                    methods=["POST"],
                ),
            ]
        )


@contextlib.contextmanager
def receivers_of(
    idp: Transmitter, tmp_path: Path, env: dict[str, str]
) -> Iterator[Callable[..., tuple[Any, str | None, Any]]]:
    """Serve ``idp``; ``configure(name, push_url="", push_token_env="PUSH")`` configures a
    receiver of its push stream once, on a database of its own (``name``: no stream id is
    recorded there): (the stream used or None, the error or None, the stream recorded)."""
    from bastion.db import Database
    from bastion.facts.store import FactStore
    from bastion.oauth.store import OAuthStore
    from bastion.signals.settings import SsfSettings
    from bastion.signals.ssf import SsfReceiver

    dbs: list[Database] = []

    def configure(name: str, push_url: str = "", push_token_env: str = "PUSH"):
        table = {
            "transmitters": [
                {"name": "idp", "issuer": idp.url, "audience": "https://bastion.example.com",
                 "delivery": "push", "bearer_env": "BEARER", "push_token_env": push_token_env,
                 "configuration_url": f"{idp.url}/.well-known/ssf-configuration"}
            ],
            **({"push_url": push_url} if push_url else {}),
        }  # fmt: skip
        s = SsfSettings.from_table(table, issuer="https://bastion.example.com", env=env)
        db = Database(str(tmp_path / f"{name}.db"))
        dbs.append(db)
        receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)
        t = s.transmitters[0]
        try:
            return anyio.run(receiver.configure, t).stream, None, receiver.store.stream(t.name)
        except ValueError as e:
            return getattr(e, "stream", None), str(e), receiver.store.stream(t.name)

    with serve(idp.app(), free_socket()) as url:
        idp.url = url
        try:
            yield configure
        finally:
            for db in dbs:
                db.close()
