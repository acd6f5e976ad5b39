"""Upstream tokens sealed at rest: Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``)
under a list of keys, the first of which seals and every one of which opens (MultiFernet), so a
key is rotated by putting a new one first and re-sealing (`bastion connections rekey`).

The keys come from ``BASTION_CONNECTION_KEYS`` (Fernet keys separated by commas or spaces) or,
without it, from the file ``<oauth.key_dir>/connection-keys`` (one key a line, mode 0600),
made with one fresh key on first use (never while the database holds connections sealed under
the keys of a file now missing, nor over a file found empty or damaged). What is sealed names
its user and upstream, and is opened only for them: a ciphertext moved to another row, altered,
or sealed under a key no longer listed is refused (`Unsealable`), never used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
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
    """The keys cannot be read: the message says which and why, and what to do."""


class ConnectionKeysMissing(ConnectionKeysError):
    """The key file is gone while the database holds connections sealed under its keys."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} is missing, and the database holds upstream connections sealed under the"
            " keys it held (a new key would open none of them): restore it from a backup (every"
            f" replica must hold the same keys), or give its keys in {ENV}; or give those"
            " connections up: `bastion connections list` names them, `bastion connections revoke"
            " <user> <upstream>` deletes each (their users connect again), and the next start"
            " makes a new key"
        )
        self.path = path


_RESTORE = (
    "restore it from a backup (every replica must hold the same keys; a new key would open"
    " none of the stored connections)"
)


def load_keys(
    key_dir: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    in_use: Callable[[], bool] = lambda: False,
    make: bool = True,
) -> list[bytes]:
    """The connection keys, newest (sealing) first: from the environment, else the key file,
    made with one new key if it does not exist, unless ``in_use()`` (the database holds sealed
    connections): then `ConnectionKeysMissing`. A file that holds no key, or anything but keys
    (cut short, damaged), is refused, never replaced. ``make=False`` (the CLI, perhaps run as
    another user than the server's, who could then not read the file) writes no file: a key
    of this call only stands in, which opens nothing and seals nothing that is kept."""
    env = os.environ if env is None else env
    text = env.get(ENV, "")
    if text.strip():
        return _parsed(text, ENV, "")
    path = Path(key_dir) / KEY_FILE
    if not path.exists():
        if in_use():
            raise ConnectionKeysMissing(path)
        if not make:
            return [Fernet.generate_key()]
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Whole or not at all; another replica may make it first: theirs is read below.
        atomic_files.create(path, Fernet.generate_key() + b"\n")
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as e:
        raise ConnectionKeysError(f"{path} cannot be read: {e.strerror}") from None
    if not text.strip():
        raise ConnectionKeysError(
            f"{path} holds no connection key (empty or damaged): {_RESTORE}; if no upstream"
            " connection is stored, remove it and the next start makes a new key"
        )
    return _parsed(text, str(path), f": the file is damaged or cut short; {_RESTORE}")


def _parsed(text: str, where: str, advice: str) -> list[bytes]:
    keys = [k.encode() for k in _SPLIT.split(text.strip()) if k]
    if not keys:  # separators only (``,``)
        raise ConnectionKeysError(f"{where} holds no connection key")
    for n, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except ValueError:
            raise ConnectionKeysError(
                f"{where}: key {n} is not a Fernet key (32 bytes, URL-safe base64, as"
                f" `bastion connections new-key` prints){advice}"
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
