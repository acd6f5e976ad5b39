"""Open registration is limited per address and in number (429 with Retry-After, RFC 7591's
``invalid_client_metadata``), and a self-registered client that never got a grant is deleted by
housekeeping; a client with a grant, one registered with an initial access token, a revoked one
and one in the middle of an authorization stay."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlencode

from bastion.oauth.store import Client

from .support import Bastion, pkce_pair, running_bastion

IAT = {"Authorization": "Bearer initial-access-token-for-tests"}
BODY = {"redirect_uris": ["http://127.0.0.1:9/callback"], "token_endpoint_auth_method": "none"}


def register(bastion: Bastion, headers: dict | None = None):
    return bastion.http.post(f"{bastion.url}/register", json=BODY, headers=headers)


def client_ids(bastion: Bastion) -> set[str]:
    return {c.client_id for c in bastion.server.store.clients()}


def test_open_registrations_from_one_address_are_limited(sqlite_url, tmp_path):
    limits = {"max_per_address": 3, "window_seconds": 600}
    with running_bastion(sqlite_url, tmp_path, open_registration=limits) as bastion:
        for _ in range(3):
            assert register(bastion).status_code == 201
        before = bastion.rows()
        refused = register(bastion)
        assert refused.status_code == 429
        assert refused.json()["error"] == "invalid_client_metadata"
        assert "your address" in refused.json()["error_description"]
        assert 1 <= int(refused.headers["retry-after"]) <= 600
        assert bastion.rows() == before
        # An initial access token is not an open registration: not limited.
        assert register(bastion, IAT).status_code == 201
        bastion.clock.advance(601)
        assert register(bastion).status_code == 201
        bastion.server.refusals.flush(everything=True)
        events = bastion.server.audit.events("registration.refused")
        assert [e.detail["reason"] for e in events] == ["address"]


def test_open_registrations_without_a_grant_are_capped_in_total(sqlite_url, tmp_path):
    limits = {"max_unused_clients": 2}
    with running_bastion(sqlite_url, tmp_path, open_registration=limits) as bastion:
        first = register(bastion).json()
        assert register(bastion).status_code == 201
        refused = register(bastion)
        assert refused.status_code == 429 and "not been used" in refused.text
        assert int(refused.headers["retry-after"]) >= 1
        # Once a client has a grant it no longer counts against the cap.
        bastion.code_for(first)
        assert register(bastion).status_code == 201


def test_housekeeping_deletes_self_registered_clients_that_never_got_a_grant(bastion: Bastion):
    store = bastion.server.store
    used = bastion.register()
    bastion.tokens_for(used)
    unused = bastion.register()
    midway = bastion.register()
    trusted = register(bastion, IAT).json()
    revoked = bastion.register()
    store.revoke_client(revoked["client_id"], bastion.clock(), actor="test")
    now = bastion.clock()
    document = Client(
        client_id="https://agent.example/client.json",
        client_name="Doc agent",
        redirect_uris=("http://127.0.0.1:9/callback",),
        grant_types=("authorization_code",),
        token_endpoint_auth_method="none",
        scope=None,
        source="metadata_document",
        metadata={},
        created_at=now,
        revoked_at=None,
    )
    store.save_client(document)
    revoked_document = replace(document, client_id="https://agent.example/revoked.json")
    store.save_client(revoked_document)
    store.revoke_client(revoked_document.client_id, now, actor="test")

    seconds = bastion.server.settings.open_registration.unused_client_seconds
    assert seconds == 24 * 3600
    bastion.clock.advance(seconds - 300)
    # An authorization in progress keeps its client.
    _, challenge = pkce_pair()
    params = bastion.authorize_params(midway, challenge)
    assert bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}").status_code == 200
    bastion.clock.advance(301)
    bastion.server.housekeeping()

    remaining = client_ids(bastion)
    assert unused["client_id"] not in remaining
    assert document.client_id not in remaining
    assert {
        used["client_id"],
        midway["client_id"],
        trusted["client_id"],
        revoked["client_id"],
        revoked_document.client_id,
    } <= remaining
    registered = {
        r[0] for r in bastion.db.execute("SELECT client_id FROM oauth_open_registrations")
    }
    assert unused["client_id"] not in registered and used["client_id"] in registered
    # The deleted client is simply unknown now.
    params = bastion.authorize_params(unused, challenge)
    response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
    assert response.status_code == 400 and "unknown" in response.text


def test_registration_limits_hold_on_postgresql(postgres_url, tmp_path):
    limits = {"max_per_address": 2}
    with running_bastion(postgres_url, tmp_path, open_registration=limits) as bastion:
        assert [register(bastion).status_code for _ in range(3)] == [201, 201, 429]
        bastion.clock.advance(24 * 3600 + 1)
        bastion.server.housekeeping()
        assert client_ids(bastion) == set()


def test_an_ipv6_network_is_one_address_for_the_registration_limit(sqlite_url, tmp_path):
    # A host is given a whole /64: counted per address, it could register from each in turn.
    # (The test server trusts X-Forwarded-For from the loopback proxy, as uvicorn does.)
    limits = {"max_per_address": 2, "window_seconds": 600}
    with running_bastion(sqlite_url, tmp_path, open_registration=limits) as bastion:

        def from_address(address: str):
            return register(bastion, {"X-Forwarded-For": address})

        assert from_address("2001:db8:5:6::1").status_code == 201
        assert from_address("2001:db8:5:6::2").status_code == 201
        refused = from_address("2001:db8:5:6:abcd::99")
        assert refused.status_code == 429 and "your address" in refused.text
        assert from_address("2001:db8:5:7::1").status_code == 201  # another network


def test_clients_named_by_metadata_documents_count_against_the_registration_limits(
    sqlite_url, tmp_path
):
    # A metadata document URL is a registration too: the server keeps a row per document. One
    # host with many URLs (or a wildcard domain with many hosts) could otherwise fill the
    # clients table past every limit on /register.
    from .test_client_metadata_documents import REDIRECT, host_serving

    limits = {"max_per_address": 2, "window_seconds": 600}
    with host_serving(tmp_path) as host:
        settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
        with running_bastion(
            sqlite_url, tmp_path, open_registration=limits, client_metadata=settings
        ) as bastion:

            def authorize(path: str):
                client = {"client_id": host.document(path), "redirect_uris": [REDIRECT]}
                _, challenge = pkce_pair()
                params = urlencode(bastion.authorize_params(client, challenge))
                return bastion.http.get(f"{bastion.url}/authorize?{params}")

            assert register(bastion).status_code == 201
            assert authorize("/one.json").status_code == 200
            before = client_ids(bastion)
            refused = authorize("/two.json")
            assert refused.status_code == 400 and "your address" in refused.text
            assert client_ids(bastion) == before
            # A document already known is not registered again.
            assert authorize("/one.json").status_code == 200
