"""TLS terminated by `bastion serve` itself: the certificate and key are checked before the
server starts, so that a missing, unreadable or mismatched file is a start error that names the
file, never a traceback from inside uvicorn (docs/operations.md, "TLS")."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from bastion.server.config import ConfigError, ServerConfig


def tls_options(config: ServerConfig) -> dict[str, Any]:
    """uvicorn's TLS options for ``config`` (none without a certificate), once both files read
    and the key is the certificate's."""
    if not config.tls_certificate:
        return {}
    for setting, name in (("tls_certificate", config.tls_certificate), ("tls_key", config.tls_key)):
        path = Path(name)
        try:
            path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{setting} {name}: cannot be read: {e.strerror or e}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_certificate, config.tls_key, password=_no_password)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(
            f"tls_certificate {config.tls_certificate} and tls_key {config.tls_key} do not make"
            f" a TLS identity: {e}; give a PEM certificate chain and its unencrypted PEM key"
        ) from None
    return {"ssl_certfile": config.tls_certificate, "ssl_keyfile": config.tls_key}


def _no_password() -> bytes:
    # Asked only for an encrypted key: refused here, rather than prompting on the terminal.
    raise ValueError("the key is encrypted (bastion reads only unencrypted keys)")
