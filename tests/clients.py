"""The suite's own HTTP clients share one reading of the CA bundle (`TRUST`): httpx reads it
again for each client made without ``verify`` (about 15 ms of CPU), and the suite makes
thousands, most of them to plain-HTTP servers on the loopback."""

from __future__ import annotations

from typing import Any

import httpx

TRUST = httpx.create_ssl_context()


def client(**options: Any) -> httpx.Client:
    """An `httpx.Client` with ``options``, trusting `TRUST` unless ``verify`` says otherwise."""
    return httpx.Client(**{"verify": TRUST, **options})


def get(url: str, **options: Any) -> httpx.Response:
    """`httpx.get` without reading the CA bundle again."""
    with client() as http:
        return http.get(url, **options)


def post(url: str, **options: Any) -> httpx.Response:
    """`httpx.post` without reading the CA bundle again."""
    with client() as http:
        return http.post(url, **options)


def ready(base_url: str, verify: Any = TRUST) -> bool:
    """Whether the bastion at ``base_url`` answers ``/readyz`` with 200 (False while nothing
    answers there yet)."""
    try:
        with client(verify=verify) as http:
            return http.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
