"""Every page of a whole server (sign-in, sign-out, authorization, CIBA, approvals, alerts,
connections) forbids framing (clickjacking), caching and referrers to other sites, on each answer
it gives: the page, an error, and a redirect to sign in, to a person signed in or not. A page
route added without bastion's frame (`bastion.oauth.pages.page`, `see_other`) fails here."""

from __future__ import annotations

import re

import httpx
from starlette.routing import Route

from tests.gateway.support import PASSWORD, start
from tests.oauth.support import hidden_fields

# The routes that are not pages: machine-facing APIs and documents.
NOT_PAGES = ("/v1/", "/api/", "/access/", "/.well-known/", "/jwks.json", "/healthz", "/readyz")
PERSONAL = {"name": "personal", "url": "http://127.0.0.1:9/mcp", "auth": "per_user"}


def framed_cached_or_referred(response: httpx.Response) -> list[str]:
    """What ``response`` lacks of the headers every page answer carries."""
    headers = response.headers
    wanted = {
        "x-frame-options": "DENY",
        "cache-control": "no-store",
        "referrer-policy": "same-origin",
        "x-content-type-options": "nosniff",
    }
    lacking = [name for name, value in wanted.items() if headers.get(name) != value]
    if "frame-ancestors 'none'" not in headers.get("content-security-policy", ""):
        lacking.append("content-security-policy")
    return lacking


def test_every_page_answer_forbids_framing_caching_and_referrers(tmp_path):
    with start(tmp_path, more_upstreams=(PERSONAL,)) as running:
        paths = sorted(
            {
                re.sub(r"\{[^}]*\}", "personal", route.path)
                for route in running.app.routes
                if isinstance(route, Route)
                and "GET" in (route.methods or ())
                and not route.path.startswith(NOT_PAGES)
                and route.path not in ("/metrics", "/v1/openapi.json")
            }
        )
        for wanted in ("/sign-in", "/sign-out", "/authorize", "/approvals", "/connections"):
            assert wanted in paths, paths
        assert "/alerts/personal" in paths and "/bc-approve/personal" in paths, paths
        with (
            httpx.Client(base_url=running.url, timeout=20) as anonymous,
            httpx.Client(base_url=running.url, timeout=20) as signed_in,
        ):
            page = signed_in.get("/sign-in", params={"next": "/approvals"})
            done = signed_in.post(
                "/sign-in",
                data={**hidden_fields(page.text), "username": "sam", "password": PASSWORD},
            )
            assert done.status_code == 303, done.text
            answers = {}
            for path in paths:
                answers[f"anonymous {path}"] = anonymous.get(path)
                answers[f"signed in {path}"] = signed_in.get(path)
            # Forms' answers: refused (no token) and the redirect after a right one.
            answers["refused acknowledgement"] = signed_in.post("/alerts/x", data={})
            answers["refused sign-in"] = anonymous.post("/sign-in", data={"next": "/approvals"})
            answers["signed in"] = done
        for name, answer in answers.items():
            assert answer.status_code in (200, 303, 400, 403, 404), (name, answer.status_code)
            assert framed_cached_or_referred(answer) == [], (name, answer.status_code)
