"""A Shared Signals transmitter for the tests: a real Starlette app (served by uvicorn) with SSF 1.0
configuration metadata, a JWKS, stream management (create, read, status, verify) and an RFC 8936
poll endpoint. It signs real SETs (RFC 8417) with its own EC key and pushes them (RFC 8935) over
HTTP to the endpoint bastion gave it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
from joserfc import jws
from joserfc.jwk import ECKey, OctKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests import clients
from tests.oauth.support import ANY_KID

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

    def queue(self, token: str) -> str:
        payload = token.split(".")[1]
        import base64

        jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
        with self.lock:
            self.queued[jti] = token
        return jti

    # -- the HTTP app --------------------------------------------------------------------------

    def app(self) -> Starlette:
        def authorized(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {BEARER}"

        async def metadata(request: Request):
            return JSONResponse(
                {
                    "spec_version": "1_0",
                    "issuer": self.url,
                    "jwks_uri": f"{self.url}/jwks.json",
                    "delivery_methods_supported": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"],
                    "configuration_endpoint": f"{self.url}/ssf/stream",
                    "status_endpoint": f"{self.url}/ssf/status",
                    "verification_endpoint": f"{self.url}/ssf/verify",
                    **(
                        {"critical_subject_members": self.critical_subject_members}
                        if self.critical_subject_members
                        else {}
                    ),
                }
            )

        async def jwks(request: Request):
            return JSONResponse({"keys": [self.key.as_dict(private=False)]})

        async def stream(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            if request.method == "GET":
                found = self.streams.get(request.query_params.get("stream_id", ""))
                return JSONResponse(found) if found else JSONResponse({}, 404)
            body = await request.json()
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
                "events_delivered": body.get("events_requested", []),
            }
            return JSONResponse(self.streams[stream_id], 201)

        async def status(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            if request.query_params.get("stream_id") not in self.streams:
                return JSONResponse({}, 404)
            return JSONResponse({"status": "enabled"})

        async def verify(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, 401)
            body = await request.json()
            stream = self.streams[body["stream_id"]]
            token = self.set_token(
                VERIFICATION,
                {"state": body.get("state")},
                {"format": "opaque", "id": body["stream_id"]},
            )
            if stream["delivery"]["method"] == "urn:ietf:rfc:8936":
                self.queue(token)
            else:
                delivery = stream["delivery"]
                threading.Thread(
                    target=lambda: httpx.post(
                        delivery["endpoint_url"],
                        content=token,
                        headers={
                            "content-type": "application/secevent+jwt",
                            "authorization": delivery["authorization_header"],
                        },
                        timeout=20,
                    ),
                    daemon=True,
                ).start()
            return Response(status_code=204)

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
                Route("/.well-known/ssf-configuration", metadata),
                Route("/jwks.json", jwks),
                Route("/ssf/stream", stream, methods=["GET", "POST"]),
                Route("/ssf/status", status),
                Route("/ssf/verify", verify, methods=["POST"]),
                Route("/ssf/poll/{stream_id}", poll, methods=["POST"]),
            ]
        )
