"""OAuth client authentication at the token, revocation, introspection and backchannel endpoints
(RFC 6749 §2.3.1): ``private_key_jwt`` (RFC 7523 §2.2, `bastion.oauth.client_assertion`),
``client_secret_basic``, ``client_secret_post``, or ``none`` for public clients, each client held
to the one method it registered. Every grant type authenticates its client here: one path."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import unquote

from bastion.constant_time import same
from bastion.oauth.client_assertion import ASSERTION_TYPE, ClientAssertions
from bastion.oauth.errors import InvalidClient, InvalidRequest
from bastion.oauth.store import Client, digest


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        # A header is read as Latin-1: b64decode refuses text beyond ASCII with a ValueError
        # (not binascii.Error, its subclass), as it refuses bad base64 and bad UTF-8.
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError as exc:
        raise InvalidClient("the Basic authorization header is not valid base64") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("the Basic authorization header must hold client_id:client_secret")
    return unquote(client_id), unquote(secret)


async def authenticate_client(
    authorization: str | None,
    form: Mapping[str, str],
    find_client: Callable[[str], Awaitable[Client | None]],
    assertions: ClientAssertions | None = None,
) -> Client:
    """The client making this request, authenticated by its registered method."""
    basic = _basic_credentials(authorization) if authorization else None
    if "client_assertion" in form or "client_assertion_type" in form:
        if basic or "client_secret" in form:
            raise InvalidRequest("use one client authentication method, not a secret and a JWT")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise InvalidClient(f"client_assertion_type must be {ASSERTION_TYPE!r}")
        if not form.get("client_assertion"):
            raise InvalidClient("client_assertion is empty")
        if assertions is None:
            raise InvalidClient("this server does not accept client assertions")
        return await assertions.authenticate(
            form["client_assertion"], form.get("client_id"), find_client
        )
    if basic and "client_secret" in form:
        raise InvalidRequest("use one client authentication method, not Basic and client_secret")
    if basic:
        client_id, secret, method = basic[0], basic[1], "client_secret_basic"
        if form.get("client_id") not in (None, client_id):
            raise InvalidRequest("client_id in the body differs from the Basic credentials")
    elif "client_secret" in form:
        client_id, secret, method = (
            form.get("client_id", ""),
            form["client_secret"],
            "client_secret_post",
        )
    else:
        client_id, secret, method = form.get("client_id", ""), None, "none"
    if not client_id:
        raise InvalidClient(
            "client authentication is required (client_id and, if confidential, a secret)"
        )
    client = await find_client(client_id)
    if client is None or client.revoked_at is not None:
        raise InvalidClient(f"client {client_id!r} is unknown or revoked")
    if method != client.token_endpoint_auth_method:
        # A private_key_jwt client that sends only its client_id lands here too: refused.
        raise InvalidClient(
            f"client {client_id!r} is registered for {client.token_endpoint_auth_method!r},"
            f" not {method!r}"
        )
    if secret is not None and not (
        client.secret_digest and same(digest(secret), client.secret_digest)
    ):
        raise InvalidClient(f"the secret of client {client_id!r} is wrong")
    return client
