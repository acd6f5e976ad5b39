"""Secrets as an operator sees them: a URL's password and the values of a query's secret
parameters, replaced wherever bastion writes a URL or a request target to a log, an error or the
terminal (docs/security.md, "Secrets in logs")."""

from __future__ import annotations

from urllib.parse import unquote_plus, urlsplit

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


def safe_url(url: str) -> str:
    """``url`` (a database's, Redis's) without its password, in the authority
    (``postgresql://user:***@host``) or in the query (``?password=[redacted]``)."""
    try:
        password = urlsplit(url).password
    except ValueError:  # a port that is not a number: the URL is named to say it is wrong
        password = None
    if password:
        url = url.replace(f":{password}@", ":***@", 1)
    return redact_query(url)
