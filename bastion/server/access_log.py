"""uvicorn's access log without the secrets a query string can carry (docs/security.md, "Secrets
in logs").

Authorization codes and their state come back to bastion's callbacks in the query (a company
OpenID provider's, an upstream's), and a client may put its access token there (RFC 6750 §2.3,
which bastion refuses, but uvicorn logs the request first). Every access log line goes through
the ``uvicorn.access`` logger, whatever path served the request: the filter there writes the value
of each such parameter as ``[redacted]``, its name kept.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
# A parameter is taken for a secret if its name is one of these, or holds one of the words:
# the credentials of OAuth 2.0 and OpenID Connect (code, state, *_token, client_secret,
# code_verifier, client_assertion, auth_req_id, device_code) and of APIs (api_key, password).
SECRET_NAMES = frozenset({"code", "state", "key", "auth_req_id", "device_code", "user_code"})
SECRET_WORDS = ("token", "secret", "password", "assertion", "verifier", "api_key")


def is_secret_parameter(name: str) -> bool:
    name = unquote_plus(name).lower()
    return name in SECRET_NAMES or any(word in name for word in SECRET_WORDS)


def redact_query(target: str) -> str:
    """``target`` (a path and its query, as the access log writes it) with the value of each
    secret parameter replaced."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    items = []
    for item in query.split("&"):
        name, equals, _ = item.partition("=")
        items.append(f"{name}={REDACTED}" if equals and is_secret_parameter(name) else item)
    return f"{path}?{'&'.join(items)}"


class QueryRedaction(logging.Filter):
    """On ``uvicorn.access``, whose lines are ``'%s - "%s %s HTTP/%s" %d'`` with the path and
    query third."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 2 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter once on uvicorn's access logger (it outlives uvicorn's dictConfig)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryRedaction) for f in logger.filters):
        logger.addFilter(QueryRedaction())
