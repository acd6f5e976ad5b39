"""RFC 9068 access tokens and the resource-server verifier: every forgery is refused."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey

from bastion.oauth import InvalidToken

from .support import Bastion


def claims_of(token: str) -> tuple[dict, dict]:
    header, payload, _ = token.split(".")
    decode = lambda part: json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # noqa: E731
    return decode(header), decode(payload)


@pytest.fixture
def issued(bastion: Bastion) -> dict:
    client = bastion.register()
    return bastion.tokens_for(client)


def refused(bastion: Bastion, token: str, reason: str, resource: str | None = None) -> None:
    with pytest.raises(InvalidToken, match=reason):
        bastion.server.verifier.verify(token, resource or bastion.resource)


def test_access_token_is_an_rfc_9068_jwt(bastion: Bastion, issued: dict):
    header, claims = claims_of(issued["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256" and header["kid"]
    assert claims["iss"] == bastion.url
    assert claims["aud"] == bastion.resource
    assert claims["sub"] == "alice"
    assert {"client_id", "scope", "jti", "iat", "exp"} <= set(claims)
    assert claims["exp"] - claims["iat"] == bastion.server.settings.access_token_seconds
    assert issued["token_type"] == "Bearer"


def test_token_for_another_resource_is_refused(bastion: Bastion, issued: dict):
    refused(bastion, issued["access_token"], "not for", resource=bastion.other_resource)


def test_expired_token_is_refused(bastion: Bastion, issued: dict):
    settings = bastion.server.settings
    bastion.clock.advance(settings.access_token_seconds + settings.leeway_seconds + 1)
    refused(bastion, issued["access_token"], "expired")


def test_alg_none_is_refused(bastion: Bastion, issued: dict):
    header, claims = claims_of(issued["access_token"])
    encode = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()  # noqa: E731
    unsigned = f"{encode({**header, 'alg': 'none'})}.{encode(claims)}."
    refused(bastion, unsigned, "alg 'none'")


def test_hs256_with_the_public_key_as_secret_is_refused(bastion: Bastion, issued: dict):
    header, claims = claims_of(issued["access_token"])
    public = json.dumps(bastion.server.keys.jwks()["keys"][0]).encode()
    forged = jwt.encode(
        {**header, "alg": "HS256"}, claims, OctKey.import_key(public), algorithms=["HS256"]
    )
    refused(bastion, forged, "alg 'HS256'")


def test_token_signed_by_an_unknown_key_is_refused(bastion: Bastion, issued: dict):
    header, claims = claims_of(issued["access_token"])
    stranger = ECKey.generate_key("P-256")
    # Claiming the real kid: the signature does not verify.
    forged = jwt.encode(header, claims, stranger, algorithms=["ES256"])
    refused(bastion, forged, "signature")
    # Claiming a kid of its own: no such key.
    forged = jwt.encode({**header, "kid": "stranger"}, claims, stranger, algorithms=["ES256"])
    refused(bastion, forged, "kid 'stranger'")


def test_typ_other_than_at_jwt_is_refused(bastion: Bastion, issued: dict):
    header, claims = claims_of(issued["access_token"])
    signer = bastion.server.keys.signer()
    for typ in ("JWT", None):
        forged_header = {k: v for k, v in {**header, "typ": typ}.items() if v is not None}
        forged = jwt.encode(forged_header, claims, signer, algorithms=["ES256"])
        refused(bastion, forged, "typ")


def test_tampered_claims_are_refused(bastion: Bastion, issued: dict):
    header_part, _, signature = issued["access_token"].split(".")
    _, claims = claims_of(issued["access_token"])
    claims["scope"] = "tools:read tools:call"
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    refused(bastion, f"{header_part}.{payload}.{signature}", "signature")


def test_token_of_another_issuer_is_refused(bastion: Bastion, issued: dict):
    header, claims = claims_of(issued["access_token"])
    forged = jwt.encode(
        header, {**claims, "iss": "https://evil.example"}, bastion.server.keys.signer()
    )
    refused(bastion, forged, "iss")


def test_well_signed_token_never_issued_is_refused(bastion: Bastion, issued: dict):
    header, claims = claims_of(issued["access_token"])
    forged = jwt.encode(header, {**claims, "jti": "never-issued"}, bastion.server.keys.signer())
    refused(bastion, forged, "unknown jti")


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"iat": 120}, "issued in the future"),
        ({"nbf": 120}, "not valid yet"),
    ],
    ids=["iat", "nbf"],
)
def test_token_not_valid_yet_is_refused(bastion: Bastion, issued: dict, change, reason):
    # Signed by the server's key, its jti issued: only the time refuses it. Past the leeway.
    header, claims = claims_of(issued["access_token"])
    later = {name: int(bastion.clock()) + seconds for name, seconds in change.items()}
    forged = jwt.encode(header, {**claims, **later}, bastion.server.keys.signer())
    refused(bastion, forged, reason)


@pytest.mark.parametrize("name, value", [("sub", None), ("client_id", None), ("sub", 7)])
def test_token_without_its_user_or_client_is_refused(bastion: Bastion, issued: dict, name, value):
    header, claims = claims_of(issued["access_token"])
    claims = {k: v for k, v in {**claims, name: value}.items() if v is not None}
    forged = jwt.encode(header, claims, bastion.server.keys.signer())
    refused(bastion, forged, f"claim '{name}' is missing")


def test_refusals_are_audited(bastion: Bastion, issued: dict):
    refused(bastion, "not-a-token", "compact")
    events = bastion.server.audit.events("token.refused")
    assert events and events[0].detail["reason"] == "format"
    assert events[0].detail["description"].startswith("not a compact JWS")
    assert "not-a-token" not in json.dumps([e.detail for e in events])


def test_jwks_serves_public_keys_only(bastion: Bastion, issued: dict):
    jwks = bastion.http.get(f"{bastion.url}/jwks.json").json()
    assert jwks["keys"]
    for key in jwks["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
        assert key["kty"] == "EC" and key["alg"] == "ES256" and key["use"] == "sig" and key["kid"]
        assert ECKey.import_key(key).is_private is False


def test_private_keys_are_files_only_the_owner_can_read(bastion: Bastion, issued: dict):
    key_dir = bastion.server.settings.key_dir
    files = os.listdir(key_dir)
    assert files
    for name in files:
        mode = stat.S_IMODE(os.stat(os.path.join(key_dir, name)).st_mode)
        assert mode == 0o600
    stored = json.dumps(bastion.db.execute("SELECT * FROM oauth_signing_keys"))
    assert '"d"' not in stored


def test_rotation_keeps_tokens_of_the_previous_key_valid(bastion: Bastion, issued: dict):
    old_kid = claims_of(issued["access_token"])[0]["kid"]
    new_kid = bastion.server.keys.rotate(actor="test")
    assert new_kid != old_kid
    # The previous key's token still verifies; new tokens are signed by the new key.
    bastion.server.verifier.verify(issued["access_token"], bastion.resource)
    client = bastion.register()
    fresh = bastion.tokens_for(client)
    assert claims_of(fresh["access_token"])[0]["kid"] == new_kid
    kids = {k["kid"] for k in bastion.http.get(f"{bastion.url}/jwks.json").json()["keys"]}
    assert kids == {old_kid, new_kid}
    # Once every token of the old key has expired, the key leaves the JWKS and the disk.
    settings = bastion.server.settings
    bastion.clock.advance(settings.access_token_seconds + settings.leeway_seconds + 120)
    bastion.server.keys.prune()
    kids = {k["kid"] for k in bastion.http.get(f"{bastion.url}/jwks.json").json()["keys"]}
    assert kids == {new_kid}
    # (The key directory also holds the form secret, form-tokens.key: not a signing key.)
    signing = [name for name in os.listdir(settings.key_dir) if name.endswith(".pem")]
    assert signing == [f"{new_kid}.pem"]


def test_a_second_server_on_the_same_database_verifies_tokens_of_the_first(
    bastion: Bastion, issued
):
    from bastion.oauth import AuthorizationServer

    replica = AuthorizationServer(bastion.server.settings, bastion.db, clock=bastion.clock)
    verified = replica.verifier.verify(issued["access_token"], bastion.resource)
    assert verified.subject == "alice"


def test_private_keys_never_reach_logs_audit_or_database(bastion: Bastion, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    client = bastion.register()
    bastion.tokens_for(client)
    bastion.server.keys.rotate(actor="test")
    bastion.tokens_for(client)
    private_values = []
    for name in os.listdir(bastion.server.settings.key_dir):
        if not name.endswith(".pem"):
            continue  # the form secret (form-tokens.key), not a signing key
        with open(os.path.join(bastion.server.settings.key_dir, name), "rb") as pem:
            private_values.append(ECKey.import_key(pem.read()).as_dict(private=True)["d"])
    audit = json.dumps([e.detail for e in bastion.server.audit.events()])
    everything = json.dumps(
        {
            t: bastion.db.execute(f"SELECT * FROM {t}")
            for t in ("oauth_signing_keys", "audit_events")
        }
    )
    for d in private_values:
        assert d not in caplog.text and d not in audit and d not in everything
    assert "PRIVATE KEY" not in caplog.text


def test_disabling_a_user_refuses_their_tokens_on_next_use(bastion: Bastion, issued: dict):
    assert bastion.server.store.disable_user("alice", bastion.clock(), actor="test")
    refused(bastion, issued["access_token"], "revoked")


def stolen_key(bastion: Bastion, token: str) -> ECKey:
    """The private key that signed ``token``, read from the key directory, as a thief has it."""
    kid = claims_of(token)[0]["kid"]
    with open(os.path.join(bastion.server.settings.key_dir, f"{kid}.pem"), "rb") as pem:
        return ECKey.import_key(pem.read())


TEN_YEARS = 10 * 365 * 86400

FORGED_CLAIMS = {
    "sub": lambda claims, bastion: {"sub": "bob"},
    "scope": lambda claims, bastion: {"scope": claims["scope"] + " tools:call"},
    "exp": lambda claims, bastion: {"exp": claims["exp"] + TEN_YEARS},
    "client_id": lambda claims, bastion: {"client_id": "another-client"},
    "aud": lambda claims, bastion: {"aud": bastion.other_resource},
    "act": lambda claims, bastion: {"act": {"sub": claims["client_id"]}},
}


@pytest.mark.parametrize("change", FORGED_CLAIMS)
def test_a_token_signed_with_a_stolen_key_under_a_live_jti_with_other_claims_is_refused(
    bastion: Bastion, issued: dict, change, caplog
):
    # The finding's case: the key was rotated out (it still verifies the tokens it signed) and
    # its private half stolen; the thief reuses the jti of a live token, changing one claim.
    token = issued["access_token"]
    key = stolen_key(bastion, token)
    bastion.server.keys.rotate(actor="test")
    header, claims = claims_of(token)
    forged = jwt.encode(header, {**claims, **FORGED_CLAIMS[change](claims, bastion)}, key)
    resource = bastion.other_resource if change == "aud" else bastion.resource
    refused(bastion, forged, "not issued by this server", resource=resource)
    warnings = [r for r in caplog.records if r.name == "bastion.oauth.verifier"]
    assert warnings and warnings[-1].levelname == "WARNING"
    assert claims["jti"] in warnings[-1].getMessage() and forged not in caplog.text
    # The token as issued still verifies.
    assert bastion.server.verifier.verify(token, bastion.resource).subject == "alice"


def test_a_token_issued_before_digests_were_kept_verifies_until_its_stored_expiry(
    bastion: Bastion, issued: dict
):
    """Rows from before the upgrade hold no digest: their token keeps working (for at most
    access_token_seconds), but only with the stored expiry."""
    token = issued["access_token"]
    header, claims = claims_of(token)
    bastion.db.execute(
        "UPDATE oauth_access_tokens SET token_digest = NULL, kid = NULL WHERE jti = ?",
        (claims["jti"],),
    )
    assert bastion.server.verifier.verify(token, bastion.resource).expires_at == claims["exp"]
    forged = jwt.encode(
        header, {**claims, "exp": claims["exp"] + TEN_YEARS}, stolen_key(bastion, token)
    )
    refused(bastion, forged, "not issued by this server")


def test_a_retired_key_stops_verifying_at_once_and_its_tokens_are_revoked(
    bastion: Bastion, issued: dict
):
    from bastion.oauth import AuthorizationServer

    token = issued["access_token"]
    old_kid = claims_of(token)[0]["kid"]
    replica = AuthorizationServer(bastion.server.settings, bastion.db, clock=bastion.clock)
    replica.verifier.verify(token, bastion.resource)  # the replica holds the old key now
    key = stolen_key(bastion, token)
    new_kid = bastion.server.keys.rotate(actor="test")

    assert bastion.server.keys.retire(old_kid, actor="test") == 1

    # At once: on this server the key is gone; a replica that has not reread the key table
    # yet finds the token revoked.
    refused(bastion, token, f"kid {old_kid!r} is not a key")
    with pytest.raises(InvalidToken, match="revoked"):
        replica.verifier.verify(token, bastion.resource)
    header, claims = claims_of(token)
    never_issued = jwt.encode(header, {**claims, "jti": "minted-by-the-thief"}, key)
    refused(bastion, never_issued, f"kid {old_kid!r} is not a key")
    with pytest.raises(InvalidToken, match="unknown jti"):
        replica.verifier.verify(never_issued, bastion.resource)
    kids = {k["kid"] for k in bastion.http.get(f"{bastion.url}/jwks.json").json()["keys"]}
    assert kids == {new_kid}
    assert not os.path.exists(os.path.join(bastion.server.settings.key_dir, f"{old_kid}.pem"))
    # Tokens of the key that signs now are untouched.
    fresh = bastion.tokens_for(bastion.register())["access_token"]
    assert bastion.server.verifier.verify(fresh, bastion.resource).subject == "alice"


def test_retiring_the_key_that_signs_is_refused_and_changes_nothing(bastion: Bastion, issued: dict):
    from bastion.oauth.store import KeyRetirementRefused

    kid = claims_of(issued["access_token"])[0]["kid"]
    with pytest.raises(KeyRetirementRefused, match="rotate"):
        bastion.server.keys.retire(kid, actor="test")
    with pytest.raises(KeyRetirementRefused, match="no signing key"):
        bastion.server.keys.retire("not-a-kid", actor="test")
    assert [k["kid"] for k in bastion.server.keys.jwks()["keys"]] == [kid]
    assert os.path.exists(os.path.join(bastion.server.settings.key_dir, f"{kid}.pem"))
    assert bastion.server.verifier.verify(issued["access_token"], bastion.resource)
