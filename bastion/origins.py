"""Web origins (RFC 6454) as browsers send them in ``Origin``: compared by the gateway (which pages
may call ``/mcp/``) and by bastion's own pages (a form another site sent is refused)."""

from __future__ import annotations

from urllib.parse import urlsplit


def normalized_origin(value: str) -> str | None:
    """An HTTP(S) origin as browsers send it (RFC 6454: lowercase scheme and host, the port only
    if it is not the scheme's default), or None if ``value`` is no such origin (``null``, a path,
    credentials, text that is not ASCII...). An origin is ASCII (§6.2: an international host in
    its A-label form); Python lowers the host as ``str.lower``, which makes the Kelvin sign
    (U+212A) a "k", so such text must not be lowered into the ASCII origin it is not."""
    if not value.isascii():
        return None
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if (
        scheme not in ("http", "https")
        or not host
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def origin_of(url: str) -> str | None:
    """The origin of a URL (its scheme, host and port, normalized), or None if it has none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return normalized_origin(f"{parts.scheme}://{parts.netloc}")


def listed_origins(value: object, setting: str) -> tuple[str, ...]:
    """A setting's list of web origins (``setting`` names it: ``gateway.allowed_origins``), each
    as browsers send it, in lower case; ValueError naming the setting if ``value`` is not such a
    list (a path, a default port, ``*``: each page's origin is listed, never all of them)."""
    if not isinstance(value, list) or not all(
        isinstance(o, str) and normalized_origin(o) == o.lower() for o in value
    ):
        raise ValueError(
            f'{setting} must be a list of origins such as "https://app.example.com" (scheme,'
            f" host and port only; no path, no default port, no *), got {value!r}"
        )
    return tuple(o.lower() for o in value)
