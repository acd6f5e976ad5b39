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
    new_kid = bastion.server.keys.rotate()
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
    bastion.server.keys.rotate()
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
    assert bastion.server.store.disable_user("alice", bastion.clock())
    refused(bastion, issued["access_token"], "revoked")
