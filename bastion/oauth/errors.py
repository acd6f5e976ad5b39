"""OAuth errors as typed values: the RFC's ``error`` code, an ``error_description`` a person can
act on, and the HTTP status the endpoint answers with (RFC 6749 §5.2, RFC 7591 §3.2.2)."""

from __future__ import annotations


class OAuthError(Exception):
    """An error answered to the client as ``{"error": ..., "error_description": ...}``."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        # The decision record of a refusal that is one (a token exchange): answered with it,
        # so that whoever was refused can have it explained (`bastion audit show`).
        self.decision_id: str | None = None

    def as_dict(self) -> dict[str, str]:
        body = {"error": self.error, "error_description": self.description}
        if self.decision_id is not None:
            body["decision_id"] = self.decision_id  # RFC 6749 §5.2 lets a response add members
        return body


class InvalidRequest(OAuthError):
    def __init__(self, description: str) -> None:
        super().__init__("invalid_request", description)


class InvalidClient(OAuthError):
    """Client authentication failed (RFC 6749 §5.2): answered with 401."""

    def __init__(self, description: str) -> None:
        super().__init__("invalid_client", description, status=401)


class InvalidGrant(OAuthError):
    def __init__(self, description: str) -> None:
        super().__init__("invalid_grant", description)


class InvalidScope(OAuthError):
    def __init__(self, description: str) -> None:
        super().__init__("invalid_scope", description)


class InvalidTarget(OAuthError):
    """RFC 8707 §2: the requested resource is not one this server issues tokens for."""

    def __init__(self, description: str) -> None:
        super().__init__("invalid_target", description)


class UnauthorizedClient(OAuthError):
    def __init__(self, description: str) -> None:
        super().__init__("unauthorized_client", description)


class UnsupportedGrantType(OAuthError):
    def __init__(self, description: str) -> None:
        super().__init__("unsupported_grant_type", description)


class InvalidClientMetadata(OAuthError):
    """RFC 7591 §3.2.2."""

    def __init__(self, description: str) -> None:
        super().__init__("invalid_client_metadata", description)


class InvalidRedirectUri(OAuthError):
    """RFC 7591 §3.2.2."""

    def __init__(self, description: str) -> None:
        super().__init__("invalid_redirect_uri", description)


class InvalidToken(Exception):
    """A bearer token a resource server must refuse (RFC 6750 §3.1 ``invalid_token``).

    ``check`` names the check that refused it, from a fixed set (``format``, ``alg``, ``typ``,
    ``kid``, ``signature``, ``claims``, ``revoked``...); ``claims`` are the token's claims once its
    signature verified (a token this server issued), else None.
    """

    def __init__(self, reason: str, check: str = "invalid", claims: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.check = check
        self.claims = claims
