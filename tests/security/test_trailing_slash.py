"""A path that differs from a route's by a trailing ``/`` is 404 on every route family, never a
redirect to the route: a redirect's ``Location`` is built from the request (``http://`` behind a
proxy that terminates TLS and sends no forwarded headers), and a client that follows a 307 sends
its key, or its client secret, and its body again, there, in the clear."""

from __future__ import annotations

from tests.security.conftest import OAUTH
from tests.server.conftest import ADMIN_KEY

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
# (method, path): each a route's path with "/" added, or removed where the route has one.
PATHS = [
    ("POST", "/v1/authorize/"),
    ("POST", "/v1/authorize/batch/"),
    ("GET", "/v1/facts/"),
    ("PUT", "/v1/policy/"),
    ("GET", "/v1/decisions/abc/"),
    ("POST", "/api/authorize/"),
    ("POST", "/access/v1/evaluation/"),
    ("POST", "/token/"),
    ("POST", "/register/"),
    ("POST", "/revoke/"),
    ("GET", "/readyz/"),
    ("GET", "/.well-known/oauth-authorization-server/"),
]


def test_a_path_with_a_trailing_slash_is_404_never_a_redirect(database_url, served, tmp_path):
    server = served(database_url, OAUTH % (tmp_path / "keys"))
    with server.client() as http:
        answers = {
            f"{method} {path}": http.request(method, path, json={}, headers=ADMIN)
            for method, path in PATHS
        }
        wrong = {
            name: (answer.status_code, answer.headers.get("location"))
            for name, answer in answers.items()
            if answer.status_code != 404 or "location" in answer.headers
        }
        assert not wrong, wrong
        # The routes themselves answer.
        assert http.get("/readyz").status_code == 200
