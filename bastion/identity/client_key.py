"""bastion's own key toward a company identity provider: ``private_key_jwt`` client
authentication at the provider's token endpoint (OpenID Connect Core 1.0 §9, RFC 7523 §2.2 and
§3). bastion signs a short JWT (``iss`` = ``sub`` = its client_id, ``aud`` the provider's token
endpoint or issuer, a fresh ``jti``, ``iat``, ``exp``) with a private key read once at start from
``client_key_file``; the provider holds only the public half (`public_jwks` prints it), so no
secret is shared with it.

The key is never logged nor shown: an error names the file and what is wrong with it, never its
content, and the dataclasses that carry it leave it out of their ``repr``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OKPKey, RSAKey, SecurityWarning

from bastion import untrusted_json
from bastion.oauth.client_assertion import ASSERTION_TYPE
from bastion.oauth.store import new_secret

METHOD = "private_key_jwt"
# An assertion lives this long after it is made (it is made for one token request, at once):
# short, so that one seen in transit or in a provider's log is of no use soon after.
ASSERTION_SECONDS = 60
# NIST SP 800-131A: RSA keys under 2048 bits no longer sign.
MIN_RSA_BITS = 2048
# A PEM or JWK file of one private key is a few KiB; a larger file is not one.
MAX_KEY_FILE_BYTES = 65_536
# The algorithms each kind of key signs with, the first preferred (`ClientKey.algorithm`).
_RSA_ALGORITHMS = ("RS256", "PS256", "RS384", "PS384", "RS512", "PS512")
_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}
AUDIENCES = ("token_endpoint", "issuer")


class ClientKeyError(ValueError):
    """A ``client_key_file`` (or its ``client_key_id``, ``client_assertion_alg``) that cannot be
    used; the message names the file, never the key."""


@dataclass(frozen=True)
class ClientKey:
    """The private key bastion signs its client assertions to one provider with."""

    file: str
    kid: str
    # The algorithms this key can sign with, preferred first; one when client_assertion_alg
    # names it.
    algorithms: tuple[str, ...]
    key: Any = field(repr=False, compare=False)

    def algorithm(self, announced: Any) -> str | None:
        """The algorithm to sign with at a provider whose discovery document announces
        ``announced`` (``token_endpoint_auth_signing_alg_values_supported``; absent: None, and
        the preferred one is used): the first of ours it lists, or None if it lists none."""
        if announced is None:
            return self.algorithms[0]
        if not isinstance(announced, list):
            return None
        return next((a for a in self.algorithms if a in announced), None)

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK, with its ``kid``, ``use`` and ``alg``: what the provider
        registers for bastion's client."""
        return {
            **self.key.as_dict(private=False),
            "kid": self.kid,
            "use": "sig",
            "alg": self.algorithms[0],
        }


def load_client_key(path: str, kid: str | None, alg: str | None) -> ClientKey:
    """The private key of ``path`` (PEM, PKCS#8 or the traditional format, unencrypted; or one
    private JWK as JSON): RSA of at least `MIN_RSA_BITS`, EC P-256/384/521 or Ed25519.
    ``kid`` names it to the provider (default: the JWK's own ``kid``, else its RFC 7638
    thumbprint); ``alg`` fixes the algorithm (default: the first of the key's that the provider
    announces). Read at start, before the event loop runs. `ClientKeyError` says what is wrong."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise ClientKeyError(f"{path} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ClientKeyError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes: not one key")
    key, own_kid = _private_key(path, data)
    algorithms = _algorithms(path, key)
    if alg is not None:
        if alg not in algorithms:
            raise ClientKeyError(
                f"client_assertion_alg {alg!r} is not one the key of {path} signs with"
                f" ({', '.join(algorithms)})"
            )
        algorithms = (alg,)
    kid = kid or own_kid or key.thumbprint()
    if not kid.isprintable() or len(kid) > 256:
        raise ClientKeyError(f"the kid of {path} must be at most 256 printable characters")
    return ClientKey(file=path, kid=kid, algorithms=algorithms, key=key)


def _private_key(path: str, data: bytes) -> tuple[Any, str | None]:
    """(the joserfc key, the JWK's own kid or None)."""
    text = data.lstrip()
    if text.startswith(b"{"):
        try:
            document = untrusted_json.loads(text)
        except untrusted_json.JsonRefused as e:
            # The reason alone names a member (a "d" given twice), never a value of the key.
            raise ClientKeyError(f"{path} cannot be read as a JWK: {e.reason}") from None
        kty = document.get("kty") if isinstance(document, Mapping) else None
        if kty not in ("RSA", "EC", "OKP"):
            shown = kty if isinstance(kty, str) and kty.isalnum() and len(kty) < 10 else "?"
            raise ClientKeyError(
                f"{path} is a JWK of kty {shown!r}: an RSA, EC or OKP private key is needed"
            )
        try:
            with warnings.catch_warnings():
                # joserfc warns of a small RSA key: `_algorithms` refuses it, naming the file.
                warnings.simplefilter("ignore", SecurityWarning)
                key = JWKRegistry.import_key(dict(document), kty)
        except (ValueError, TypeError, KeyError, JoseError) as e:
            # Named by the kind of error alone: a message could quote the key's members.
            raise ClientKeyError(
                f"{path} cannot be read as a private JWK ({type(e).__name__})"
            ) from None
        if not key.is_private:
            raise ClientKeyError(f"{path} holds a public key: bastion signs with the private one")
        own = document.get("kid")
        return key, own if isinstance(own, str) and own else None
    if b"-----BEGIN" not in text:
        raise ClientKeyError(f"{path} is neither a PEM private key nor a JWK")
    if b"PRIVATE KEY-----" not in text:
        raise ClientKeyError(f"{path} holds a public key or certificate: give the private key")
    try:
        raw = load_pem_private_key(data, password=None)
    except TypeError:
        raise ClientKeyError(
            f"{path} is encrypted: store it unencrypted, readable only by bastion's user"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:  # named by the kind of error alone
        raise ClientKeyError(
            f"{path} cannot be read as a PEM private key ({type(e).__name__})"
        ) from None
    if isinstance(raw, rsa.RSAPrivateKey):
        if raw.key_size < MIN_RSA_BITS:
            raise ClientKeyError(
                f"{path} is an RSA key of {raw.key_size} bits: at least {MIN_RSA_BITS}"
            )
        return RSAKey.import_key(raw), None
    if isinstance(raw, ec.EllipticCurvePrivateKey):
        if raw.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise ClientKeyError(
                f"{path} is a key on the curve {raw.curve.name!r}: P-256, P-384, P-521 or Ed25519"
            )
        return ECKey.import_key(raw), None
    if isinstance(raw, ed25519.Ed25519PrivateKey):
        return OKPKey.import_key(raw), None
    raise ClientKeyError(f"{path}: an RSA, EC (P-256, P-384, P-521) or Ed25519 key, not this kind")


def _algorithms(path: str, key: Any) -> tuple[str, ...]:
    if isinstance(key, RSAKey):
        bits = key.raw_value.key_size
        if bits < MIN_RSA_BITS:
            raise ClientKeyError(f"{path} is an RSA key of {bits} bits: at least {MIN_RSA_BITS}")
        return _RSA_ALGORITHMS
    curve = key.as_dict(private=False).get("crv")
    if curve not in _CURVE_ALGORITHMS:
        raise ClientKeyError(
            f"{path} is a key on the curve {curve!r}: P-256, P-384, P-521 or Ed25519"
        )
    return (_CURVE_ALGORITHMS[curve],)


def client_assertion(
    key: ClientKey, client_id: str, audience: str, alg: str, now: float
) -> dict[str, str]:
    """In a worker thread (a signature): the form fields that authenticate bastion's client at
    the token endpoint (RFC 7523 §2.2): ``client_assertion_type`` and ``client_assertion``."""
    issued = int(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": new_secret(),
        "iat": issued,
        "exp": issued + ASSERTION_SECONDS,
    }
    header = {"alg": alg, "kid": key.kid, "typ": "JWT"}
    return {
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": jwt.encode(header, claims, key.key, algorithms=[alg]),
    }


def public_jwks(keys: list[ClientKey]) -> dict[str, Any]:
    """The JSON Web Key Set of the public halves of ``keys``."""
    return {"keys": [k.public_jwk() for k in keys]}
