"""Throttles against guessing and flooding at the authorization server, counted per the address a
request comes from (`client_address`)."""

from __future__ import annotations

from starlette.requests import Request


def client_address(request: Request) -> str | None:
    """The address the request came from: the ASGI client, which is the proxy's address unless
    ``bastion serve`` is told to trust the proxy's forwarding headers."""
    return request.client.host if request.client else None
