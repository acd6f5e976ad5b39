"""Random identifiers that people type: an alert's, an approval request's."""

from __future__ import annotations

import secrets


def typed_id(nbytes: int) -> str:
    """``nbytes`` random bytes, URL-safe, never starting with "-": an id that did would read as
    an option on a command line (``bastion alerts show -R4...``)."""
    while True:
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith("-"):
            return value
