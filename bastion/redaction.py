"""Secrets as an operator sees them: a URL's password and the values of a query's secret
parameters, replaced wherever bastion writes a URL or a request target to a log, an error or the
terminal (docs/security.md, "Secrets in logs")."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
# A parameter is taken for a secret if its name is one of these, or holds one of the words:
# the credentials of OAuth 2.0 and OpenID Connect (code, state, *_token, client_secret,
# code_verifier, client_assertion, auth_req_id, device_code), of APIs (api_key) and of database URLs
# (password, sslpassword).
SECRET_NAMES = frozenset({"code", "state", "key", "auth_req_id", "device_code", "user_code"})
SECRET_WORDS = ("token", "secret", "password", "assertion", "verifier", "api_key")


def is_secret_parameter(name: str) -> bool:
    name = unquote_plus(name).lower()
    return name in SECRET_NAMES or any(word in name for word in SECRET_WORDS)


def redact_query(target: str) -> str:
    """``target`` (a path or URL and its query) with the value of each secret parameter
    replaced, its name kept."""
    head, mark, query = target.partition("?")
    if not mark:
        return target
    items = []
    for item in query.split("&"):
        name, equals, _ = item.partition("=")
        items.append(f"{name}={REDACTED}" if equals and is_secret_parameter(name) else item)
    return f"{head}?{'&'.join(items)}"


def _password(url: str) -> str:
    """The password in ``url``'s authority, as written; read by hand, for a URL too malformed for
    `urlsplit` (``[::1``) is the one an error quotes."""
    _, scheme, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0] if scheme else ""
    userinfo, at, _ = authority.rpartition("@")
    return userinfo.partition(":")[2] if at else ""


def safe_url(url: str) -> str:
    """``url`` (a database's, Redis's) without its password, in the authority
    (``postgresql://user:***@host``) or in the query (``?password=[redacted]``)."""
    password = _password(url)
    if password:
        url = url.replace(f":{password}@", ":***@", 1)
    return redact_query(url)


def without_url_secrets(text: str, url: str) -> str:
    """``text`` (an error about ``url``, a library's) with ``url``'s password and secret query
    values written ``***``, as written and as decoded: libpq quotes a URL it cannot parse, or
    the token of it it stopped at."""
    query = url.partition("?")[2].partition("#")[0]
    secrets = [_password(url)] + [
        value
        for name, equals, value in (item.partition("=") for item in query.split("&"))
        if equals and is_secret_parameter(name)
    ]
    for secret in {form for s in secrets if s for form in (s, unquote_plus(s))}:
        text = text.replace(secret, "***")
    return text
