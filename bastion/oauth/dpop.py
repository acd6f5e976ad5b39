"""RFC 9449 OAuth 2.0 Demonstrating Proof of Possession (DPoP): sender-constrained tokens.

A client that sends a ``DPoP`` proof to the token endpoint (§5), or registered with
``dpop_bound_access_tokens: true`` (§5.2, which then requires one), gets an access token bound to
the proof's key: its ``cnf.jkt`` is the key's RFC 7638 thumbprint (§6.1) and ``token_type`` is
``DPoP``. A public client's refresh tokens are bound to the same key: a refresh with any other key
is refused (§5, ``invalid_dpop_proof``). A resource (the gateway) then takes the token only as
``Authorization: DPoP <token>`` with a fresh proof of that key for the very request (§7).

A proof (§4.2, checked per §4.3) is a JWT with ``typ: dpop+jwt``, an asymmetric ``alg`` of
``[oauth.dpop].algorithms``, the public key in ``jwk`` (never a private or symmetric one), and
the claims ``jti``, ``htm`` (the request's method), ``htu`` (its URL without query and fragment,
compared normalised: ASCII, its scheme and host without ASCII case), ``iat`` (at most ``max_age_seconds`` old, not in the future beyond the
leeway) and, with an access token, ``ath`` (its SHA-256, base64url). Each ``jti`` is used once
per key, remembered in the database every replica shares (`bastion.oauth.spent_jtis`).

With ``[oauth.dpop].require_nonce`` every proof must also carry a server nonce (§8, §9): a
proof without one, or with a stale one, is refused with ``use_dpop_nonce`` and a fresh nonce in
the ``DPoP-Nonce`` response header. A nonce is an HMAC of the current period under a secret of
the deployment, so every replica sharing ``key_dir`` makes and accepts the same ones with no
shared state; it is good for its period (``nonce_seconds``) and the next.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry
from joserfc.jws import JWSRegistry

from bastion import untrusted_json
from bastion.constant_time import same
from bastion.db import Database
from bastion.oauth.errors import OAuthError
from bastion.oauth.jwks import HeaderRefused, protected_header
from bastion.oauth.numeric_date import numeric_date
from bastion.oauth.settings import DPoPSettings
from bastion.oauth.spent_jtis import SpentJtis

SCHEME = "DPoP"  # the Authorization scheme and the token_type of a bound token (§7.1, §5)
HEADER = "dpop"  # the request header carrying the proof (§4.1), as ASGI spells it
NONCE_HEADER = "DPoP-Nonce"  # the response header carrying a server nonce (§8.1)
PROOF_TYPE = "dpop+jwt"
# The client metadata that makes DPoP mandatory for a client (§5.2).
CLIENT_METADATA = "dpop_bound_access_tokens"
MAX_JTI_CHARS = 256
# Members of a JWK that only a private (or symmetric) key has.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_DEFAULT_PORTS = {"http": 80, "https": 443}

_MIGRATIONS = [
    """
    CREATE TABLE oauth_dpop_bindings (
        grant_id TEXT PRIMARY KEY,
        jkt TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX oauth_dpop_bindings_expiry ON oauth_dpop_bindings (expires_at);
    """
]


class InvalidDPoPProof(OAuthError):
    """RFC 9449 §5 and §7.1: the proof is missing, malformed, or not for this request or key."""

    def __init__(self, description: str, status: int = 400) -> None:
        super().__init__("invalid_dpop_proof", description, status)


class UseDPoPNonce(InvalidDPoPProof):
    """RFC 9449 §8 and §9: the proof needs this server's current nonce, sent back as
    ``DPoP-Nonce``."""

    def __init__(self, description: str, nonce: str) -> None:
        super().__init__(description)
        self.error = "use_dpop_nonce"
        self.nonce = nonce


@dataclass(frozen=True)
class DPoPProof:
    """A proof that passed every check: the thumbprint of its key, and its jti."""

    jkt: str
    jti: str


def normalised_url(url: str) -> str:
    """``url`` as compared with ``htu`` (§4.3 item 9, RFC 3986 §6.2.2 and §6.2.3): the scheme
    and host lowercased, a default port dropped, an empty path as ``/``; no query, no fragment.
    "" for text that is no URL, or not in ASCII as every URI is (RFC 3986 §2): Python lowers
    the host as ``str.lower``, which makes the Kelvin sign (U+212A) a "k"."""
    if not url.isascii():
        return ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path or '/'}"


def access_token_hash(token: str) -> str:
    """The ``ath`` of an access token (§4.2): base64url of the SHA-256 of its ASCII form."""
    digest = hashlib.sha256(token.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def one_proof(values: Sequence[str]) -> str | None:
    """The request's single ``DPoP`` header, None without one; two or more are refused (§4.3)."""
    if len(values) > 1:
        raise InvalidDPoPProof("send exactly one DPoP header")
    return values[0] if values else None


class DPoPProofs:
    """Checks DPoP proofs and keeps what binds a grant's refresh tokens to a key."""

    def __init__(
        self,
        settings: DPoPSettings,
        db: Database,
        leeway_seconds: int,
        clock: Callable[[], float] = time.time,
        nonce_secret: Callable[[], bytes] | None = None,
    ) -> None:
        """``nonce_secret`` gives the deployment's secret nonces are made with (needed with
        ``require_nonce``; read by `read_nonce_secret`, at start in a server)."""
        if settings.require_nonce and nonce_secret is None:
            raise ValueError("[oauth.dpop] require_nonce needs a secret to make nonces with")
        self.settings = settings
        self._nonce_secret = nonce_secret
        self._secret: bytes | None = None
        self.db = db
        self.leeway = leeway_seconds
        self.clock = clock
        self.spent = SpentJtis(db)
        self._last_forgotten = 0.0
        # The public key travels in the header: an RSA key's outgrows joserfc's 512 bytes.
        self._registry = JWSRegistry(algorithms=list(settings.algorithms))
        self._registry.max_header_length = settings.max_proof_chars
        db.migrate("oauth_dpop", _MIGRATIONS)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return self.settings.algorithms

    def challenge(self, error: str | None = None, description: str | None = None) -> str:
        """A ``WWW-Authenticate`` value for the DPoP scheme (§7.1), naming the algorithms."""
        parts = []
        if error:
            parts.append(f'error="{error}"')
        if description:
            quoted = description.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'error_description="{quoted}"')
        parts.append(f'algs="{" ".join(self.algorithms)}"')
        return f"{SCHEME} " + ", ".join(parts)

    def use(self, proof: str, method: str, url: str, access_token: str | None = None) -> DPoPProof:
        """Check ``proof`` for a ``method`` request to ``url`` (with ``access_token``, whose
        hash it must carry as ``ath``), then spend its jti. Raises `InvalidDPoPProof`.

        Blocking (a signature check and a database write): call it from a worker thread."""
        checked, expires_at = self.check(proof, method, url, access_token)
        if not self.spent.use_once(f"dpop:{checked.jkt}", checked.jti, expires_at):
            raise InvalidDPoPProof("this DPoP proof was already used (its jti is spent)")
        self._forget_expired()
        return checked

    def check(
        self, proof: str, method: str, url: str, access_token: str | None = None
    ) -> tuple[DPoPProof, float]:
        """Every check of §4.3 but the replay one: the proof, and until when its jti must be
        remembered."""
        if len(proof) > self.settings.max_proof_chars:
            raise InvalidDPoPProof(
                f"the DPoP proof is longer than {self.settings.max_proof_chars} characters"
                " ([oauth.dpop].max_proof_chars)"
            )
        try:
            compact = jws.extract_compact(proof.encode("ascii"), registry=self._registry)
            header = protected_header(compact)
        except HeaderRefused as e:
            raise InvalidDPoPProof(f"the DPoP proof's {e}") from None
        except (JoseError, UnicodeError, ValueError):
            raise InvalidDPoPProof("the DPoP proof is not a signed JWT (compact form)") from None
        if header.get("typ") != PROOF_TYPE:
            raise InvalidDPoPProof(f"the DPoP proof's typ must be {PROOF_TYPE!r}")
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise InvalidDPoPProof(
                f"the DPoP proof's alg {algorithm!r} is not accepted; use one of"
                f" {list(self.algorithms)} (asymmetric only)"
            )
        key = _public_key(header.get("jwk"))
        try:
            jwt.decode(proof, key, algorithms=[algorithm], registry=self._registry)
        except (JoseError, ValueError) as exc:
            raise InvalidDPoPProof(f"the DPoP proof's signature does not verify: {exc}") from None
        # Read as every JWT from outside is: joserfc's claims come from Python's json, which
        # reads NaN, and an iat of NaN is neither too old nor in the future (a proof forever).
        try:
            claims = untrusted_json.loads(compact.payload)
        except untrusted_json.JsonRefused as e:
            raise InvalidDPoPProof(f"the DPoP proof's claims are refused: {e}") from None
        if not isinstance(claims, dict):
            raise InvalidDPoPProof("the DPoP proof's claims must be a JSON object")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS:
            raise InvalidDPoPProof(
                f"the DPoP proof needs jti, a unique string of 1 to {MAX_JTI_CHARS} characters"
            )
        if claims.get("htm") != method:
            raise InvalidDPoPProof(f"the DPoP proof's htm must be {method!r}, this request's")
        htu, expected = claims.get("htu"), normalised_url(url)
        if isinstance(htu, str) and not htu.isascii():
            raise InvalidDPoPProof(
                "the DPoP proof's htu must be a URL in ASCII (RFC 3986; an international host"
                f" in its A-label form), {expected!r}, this request's URL"
            )
        # Text that is no URL is no request's URL, even another such text.
        if not isinstance(htu, str) or not expected or normalised_url(htu) != expected:
            raise InvalidDPoPProof(f"the DPoP proof's htu must be {expected!r}, this request's URL")
        iat = numeric_date(claims.get("iat"))
        if iat is None:
            raise InvalidDPoPProof("the DPoP proof needs iat, a time in seconds")
        now, oldest = self.clock(), self.settings.max_age_seconds
        if iat > now + self.leeway:
            raise InvalidDPoPProof("the DPoP proof was made in the future (iat)")
        if iat < now - oldest - self.leeway:
            raise InvalidDPoPProof(
                f"the DPoP proof is older than {oldest} s ([oauth.dpop].max_age_seconds);"
                " make a new one for each request"
            )
        if self.settings.require_nonce and not self._nonce_ok(claims.get("nonce")):
            raise UseDPoPNonce(
                "this server requires a nonce in DPoP proofs: use the one in the DPoP-Nonce header",
                self.nonce(),
            )
        if access_token is not None and claims.get("ath") != access_token_hash(access_token):
            raise InvalidDPoPProof(
                "the DPoP proof's ath must be the SHA-256 hash (base64url) of this access token"
            )
        try:
            thumbprint = key.thumbprint()
        except (JoseError, ValueError) as exc:  # pragma: no cover - a key joserfc imported
            raise InvalidDPoPProof(f"the DPoP proof's jwk has no thumbprint: {exc}") from None
        return DPoPProof(thumbprint, jti), float(iat) + oldest + 2 * self.leeway

    # -- server nonces (§8, §9) -------------------------------------------------------------

    def nonce(self) -> str:
        """The nonce of the current period."""
        return self._nonce_of(int(self.clock() // self.settings.nonce_seconds))

    def read_nonce_secret(self) -> bytes:
        """The nonces' secret, read (made, the first time) unless it was already: a file's
        I/O."""
        if self._secret is None:
            assert self._nonce_secret is not None
            self._secret = self._nonce_secret()
        return self._secret

    def _nonce_of(self, period: int) -> str:
        mac = hmac.new(
            self.read_nonce_secret(), f"dpop-nonce:{period}".encode(), hashlib.sha256
        ).digest()
        return f"{period}.{base64.urlsafe_b64encode(mac[:18]).decode()}"

    def _nonce_ok(self, value: Any) -> bool:
        """A nonce of this period or the one before, made by this deployment."""
        if not isinstance(value, str) or len(value) > 64:
            return False
        period, _, _ = value.partition(".")
        if not (period.isascii() and period.isdigit()):  # int() refuses some of str's digits
            return False
        current = int(self.clock() // self.settings.nonce_seconds)
        return int(period) in (current, current - 1) and same(value, self._nonce_of(int(period)))

    def _forget_expired(self) -> None:
        """At most once a minute, on the path of a proof: forget spent proofs' jtis."""
        now = self.clock()
        if now - self._last_forgotten >= 60:
            self._last_forgotten = now
            self.spent.forget_expired(now)
            self.db.execute("DELETE FROM oauth_dpop_bindings WHERE expires_at < ?", (now,))

    # -- refresh tokens of public clients (§5) ---------------------------------------------

    def bind_grant(self, grant_id: str, jkt: str, expires_at: float) -> None:
        """Bind a grant's refresh tokens to the key ``jkt``; a grant keeps its first key."""
        self.db.execute(
            "INSERT INTO oauth_dpop_bindings (grant_id, jkt, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (grant_id) DO NOTHING",
            (grant_id, jkt, expires_at),
        )

    def grant_key(self, grant_id: str) -> str | None:
        """The key a grant's refresh tokens are bound to, or None."""
        rows = self.db.execute(
            "SELECT jkt FROM oauth_dpop_bindings WHERE grant_id = ?", (grant_id,)
        )
        return rows[0][0] if rows else None


def token_key(claims: Mapping[str, Any]) -> str | None:
    """The thumbprint an access token is bound to (``cnf.jkt``, §6.1), None when unbound;
    `ValueError` for a malformed ``cnf``, or one that also holds a confirmation bastion cannot
    check (RFC 8705's certificate, ``x5t#S256``): taken with the DPoP proof alone, that
    binding would be dropped."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    if not isinstance(jkt, str) or not jkt:
        raise ValueError("claim 'cnf' has no jkt (RFC 9449 §6.1)")
    if len(cnf) != 1:
        raise ValueError(
            "claim 'cnf' holds a confirmation beside the DPoP key's (jkt), which bastion cannot"
            " check"
        )
    return jkt


def _public_key(jwk: Any) -> Any:
    """The proof's ``jwk`` as a key, if it is a public asymmetric one (§4.3 items 6 and 7)."""
    if not isinstance(jwk, dict):
        raise InvalidDPoPProof("the DPoP proof's header must carry the public key as jwk")
    if jwk.get("kty") not in ("RSA", "EC", "OKP"):
        raise InvalidDPoPProof("the DPoP proof's jwk must be an RSA, EC or OKP public key")
    private = [m for m in _PRIVATE_MEMBERS if m in jwk]
    if private:
        raise InvalidDPoPProof(
            f"the DPoP proof's jwk holds private key material ({', '.join(private)}): send only"
            " the public key"
        )
    try:
        return JWKRegistry.import_key(dict(jwk))
    except (JoseError, ValueError, TypeError, KeyError) as exc:  # KeyError: a curve unknown
        raise InvalidDPoPProof(f"the DPoP proof's jwk cannot be read as a key: {exc}") from None
