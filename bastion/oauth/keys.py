"""Signing keys for access tokens (ES256, RFC 7518 §3.4) and the JWKS that publishes their public
halves (RFC 7517).

Private keys are PEM files (mode 0600) under ``key_dir``; the database holds only public JWKs and
each key's life: the newest key signs, and a retired key stays published until every token it
signed has expired, so rotation never invalidates a token early. A key whose private half may be
stolen is withdrawn at once instead (`KeyRing.retire`): unpublished, and its tokens revoked.
Private keys are never put in a JWKS, a log line or an error message.

The same directory keeps the deployment's other secrets (`deployment_secret`): random values made
once, which every replica sharing ``key_dir`` shares, such as the key of the gateway's argument
digests.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from joserfc.jwk import ECKey, KeySet

from bastion import atomic_files
from bastion.audit.actor import SERVER
from bastion.oauth.store import OAuthStore

ALGORITHM = "ES256"
# The HMAC key of the argument digests in decision records (`bastion.gateway.enforce`).
ARGUMENT_DIGEST_KEY = "argument-digest.key"
_SECRET_BYTES = 32
_RELOAD_SECONDS = 60


class SigningKeyError(ValueError):
    """A signing key's private half cannot be read: the message names its file and what to do
    (never the key)."""


class KeyRing:
    """The issuer's signing keys: one current signer, plus retired keys still verifying."""

    def __init__(
        self,
        store: OAuthStore,
        key_dir: str | os.PathLike,
        retain_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.key_dir = Path(key_dir)
        # A replica may go on signing with a retired key until it rereads the key table.
        self.retain_seconds = retain_seconds + _RELOAD_SECONDS
        self.clock = clock
        self._signer: ECKey | None = None
        self._public: KeySet | None = None
        self._signer_at = 0.0
        self._public_at = 0.0

    def _fresh(self, loaded_at: float) -> bool:
        # Another replica may rotate: reread the key table at least once a minute.
        return self.clock() - loaded_at < _RELOAD_SECONDS

    def _private_path(self, kid: str) -> Path:
        return self.key_dir / f"{kid}.pem"

    def rotate(self, *, actor: str) -> str:
        """Create a new signing key; it signs from now on. Returns its ``kid``. ``actor``:
        who, for the audit log."""
        self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ECKey.generate_key("P-256")
        kid = key.thumbprint()
        # On disk, whole, before its public half is published as the key that signs.
        if not atomic_files.create(self._private_path(kid), key.as_pem(private=True)):
            raise FileExistsError(f"{self._private_path(kid)} exists already")
        public = {**key.as_dict(private=False), "kid": kid, "use": "sig", "alg": ALGORITHM}
        try:
            self.store.add_signing_key(
                kid, json.dumps(public, sort_keys=True), self.clock(), actor=actor
            )
        except BaseException:
            # Not published (a full database, say): no private key of it is left on disk.
            self._private_path(kid).unlink(missing_ok=True)
            raise
        self.forget()
        self.prune()
        return kid

    def retire(self, kid: str, *, actor: str) -> int:
        """Withdraw the retired key ``kid`` at once, for when its private half may be stolen:
        it leaves the JWKS and verification, its private file is removed, and every access
        token it signed is revoked, which every replica learns as it learns any revocation
        (`OAuthStore.retire_signing_key`). Returns how many tokens were revoked.
        `KeyRetirementRefused` for the key that signs (rotate first) or an unknown one."""
        revoked = self.store.retire_signing_key(kid, self.clock(), actor=actor)
        self._private_path(kid).unlink(missing_ok=True)
        self.forget()
        return revoked

    def forget(self) -> None:
        """Read the key table again at the next use: another process rotated or retired."""
        self._signer = None
        self._public = None

    def prune(self) -> None:
        """Forget keys retired long enough ago that no token they signed can still be valid."""
        cutoff = self.clock() - self.retain_seconds
        for kid, _public, _created, retired in self.store.signing_keys():
            if retired is not None and retired < cutoff:
                self._private_path(kid).unlink(missing_ok=True)
        self.store.forget_signing_keys_retired_before(cutoff)

    def signer(self) -> ECKey:
        """The current signing key, creating the first one on first use. `SigningKeyError` if
        its private half cannot be read."""
        if self._signer is not None and self._fresh(self._signer_at):
            return self._signer
        key = self._current()
        if key is None:
            self.rotate(actor=SERVER)
            return self.signer()
        self._signer = key
        self._signer_at = self.clock()
        return key

    def check(self) -> None:
        """Read the current signing key's private half now, if there is one yet: a damaged file
        stops the start, not every token issuance after it (`SigningKeyError`)."""
        self._current()

    def _current(self) -> ECKey | None:
        for kid, _public, _created, retired in self.store.signing_keys():
            if retired is None and self._private_path(kid).exists():
                return self._private_key(kid)
        return None

    def _private_key(self, kid: str) -> ECKey:
        path = self._private_path(kid)
        try:
            key = ECKey.import_key(path.read_bytes(), {"kid": kid, "alg": ALGORITHM})
            why = "" if key.is_private and key.thumbprint() == kid else "it holds another key"
        except (OSError, ValueError) as e:
            why = f"{type(e).__name__}: {str(e).split('. ')[0]}"
        if why:
            raise SigningKeyError(
                f"{path}, the private key of the current signing key {kid}, cannot be used"
                f" ({why}): the file is damaged, empty or cut short; restore it from a backup"
                " (every replica shares key_dir), or start signing with a new key:"
                " `bastion signing-keys rotate` (tokens signed before stay valid until they"
                " expire, while the published key verifies them)"
            )
        return key

    def public_keys(self, refresh: bool = False) -> KeySet:
        """Every key a valid token may be signed with: public halves only."""
        if self._public is None or refresh or not self._fresh(self._public_at):
            self._public = KeySet([ECKey.import_key(jwk) for jwk in self.jwks()["keys"]])
            self._public_at = self.clock()
        return self._public

    def jwks(self) -> dict[str, list[dict]]:
        cutoff = self.clock() - self.retain_seconds
        keys = []
        for _kid, public, _created, retired in self.store.signing_keys():
            if retired is None or retired >= cutoff:
                jwk = json.loads(public)
                # Defence in depth: a JWK with any private member never leaves this function.
                keys.append(
                    {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
                )
        return {"keys": keys}


def deployment_secret(key_dir: str | os.PathLike, name: str) -> bytes:
    """The secret ``name`` of this deployment: 32 random bytes kept as hex in ``key_dir/name``
    (mode 0600), made on first use and read after, so it outlives restarts and every replica
    sharing ``key_dir`` has the same. `ValueError` if the file holds no such secret."""
    directory = Path(key_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / name
    if not path.exists():
        # Made whole or not at all, whoever comes first (another replica's is kept).
        atomic_files.create(path, (secrets.token_hex(_SECRET_BYTES) + "\n").encode())
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        secret = b""
    if len(secret) < _SECRET_BYTES:
        raise ValueError(
            f"{path} must hold a secret of {_SECRET_BYTES} bytes as hex (64 hex digits);"
            " remove it to have a new one made"
        )
    return secret
