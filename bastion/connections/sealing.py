"""Upstream tokens sealed at rest: Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``)
under a list of keys, the first of which seals and every one of which opens (MultiFernet), so a
key is rotated by putting a new one first and re-sealing (`bastion connections rekey`).

The keys come from ``BASTION_CONNECTION_KEYS`` (Fernet keys separated by commas or spaces) or,
without it, from the file ``<oauth.key_dir>/connection-keys`` (one key a line, mode 0600),
made with one fresh key on first use. What is sealed names its user and upstream, and is opened
only for them: a ciphertext moved to another row, altered, or sealed under a key no longer
listed is refused (`Unsealable`), never used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from bastion import atomic_files

ENV = "BASTION_CONNECTION_KEYS"
KEY_FILE = "connection-keys"
_SPLIT = re.compile(r"[\s,]+")


class Unsealable(Exception):
    """A sealed value that cannot be opened here (altered, another row's, or an unknown key)."""


class ConnectionKeysError(ValueError):
    """The keys cannot be read: the message says which and why."""


def load_keys(key_dir: str | os.PathLike, env: Mapping[str, str] | None = None) -> list[bytes]:
    """The connection keys, newest (sealing) first: from the environment, else the key file."""
    env = os.environ if env is None else env
    text = env.get(ENV, "")
    where = ENV
    if not text.strip():
        path = Path(key_dir) / KEY_FILE
        where = str(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Whole or not at all; another replica may make it first: theirs is read below.
            atomic_files.create(path, Fernet.generate_key() + b"\n")
        text = path.read_text()
    keys = [k.encode() for k in _SPLIT.split(text.strip()) if k]
    if not keys:
        raise ConnectionKeysError(f"{where} holds no connection key")
    for key in keys:
        try:
            Fernet(key)
        except ValueError:
            raise ConnectionKeysError(
                f"{where}: each connection key must be a Fernet key (32 bytes, URL-safe"
                " base64), as `bastion connections new-key` prints"
            ) from None
    return keys


class Sealer:
    """Seals and opens the tokens of one (user, upstream) pair."""

    def __init__(self, keys: list[bytes]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def seal(self, subject: str, upstream: str, value: Mapping[str, Any]) -> str:
        plain = json.dumps({"subject": subject, "upstream": upstream, "value": dict(value)})
        return self._fernet.encrypt(plain.encode()).decode()

    def open(self, subject: str, upstream: str, sealed: str) -> dict[str, Any]:
        try:
            data = json.loads(self._fernet.decrypt(sealed.encode()))
        except (InvalidToken, ValueError):
            raise Unsealable(
                f"the sealed tokens of {subject!r} for {upstream!r} cannot be opened with the"
                " connection keys (altered, or sealed under a key that is no longer listed)"
            ) from None
        if (
            not isinstance(data, dict)
            or data.get("subject") != subject
            or data.get("upstream") != upstream
            or not isinstance(data.get("value"), dict)
        ):
            raise Unsealable(
                f"the sealed tokens stored for {subject!r} and {upstream!r} are not theirs"
            )
        return data["value"]

    def rotate(self, sealed: str) -> str:
        """The same value sealed under the first key (`Unsealable` if no key opens it)."""
        try:
            return self._fernet.rotate(sealed.encode()).decode()
        except InvalidToken:
            raise Unsealable("a sealed value cannot be opened with the connection keys") from None
